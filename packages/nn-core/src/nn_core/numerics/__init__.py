"""Numerics shared by every method: token losses, gradient statistics, integrated
gradients and sparse teacher logits."""
