"""Selections: :class:`NeuronSet`, :class:`WeightSet` and foreign selection formats."""
