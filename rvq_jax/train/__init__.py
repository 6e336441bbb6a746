"""Training: one loop for every stage; stages differ in their models and step functions."""
