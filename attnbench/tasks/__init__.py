"""Training tasks from the GPA paper (Jetchev et al. 2021): affine copying."""
