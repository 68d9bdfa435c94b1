"""Numerical solvers shared by the methods: NMF, active-set least squares, simplex projection, eclat."""
