"""One step of `fit`, `evaluate` or `predict` under a distribution: the
route it takes (`route`), and each route; and layers called outside a
step (`direct_calls`)."""
