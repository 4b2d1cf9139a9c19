"""One step of `fit`, `evaluate` or `predict` under a distribution: the
route it takes (`route`), and each route."""
