"""Interventions on a running model: site hooks, capture, neuron masks and weight masks."""
