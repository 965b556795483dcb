"""Evaluation: MedMNIST metrics and the linear probe on cached features."""
