"""Graph passes over torch.fx graphs and the pass manager (issue 3)."""
