"""Running a tool: manifests (provenance) and the shared CLI plumbing."""
