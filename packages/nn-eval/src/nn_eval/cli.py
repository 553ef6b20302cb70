def main(argv: list[str] | None = None) -> int:
    raise SystemExit("not yet implemented")
