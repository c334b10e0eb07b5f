"""Privacy: the pure math of differential privacy (events, accounting, ledger, clipping/noise).

In place: ``events`` (frozen, serialisable privacy events), ``accounting`` (RDP and PRV
composition, noise calibration), ``ledger`` (the per-site record and budget check) and
``clipping`` (client-level clip and Gaussian noise). Still to come (see the privacy and
secure-aggregation issues): Opacus DP-SGD at the sites, budget enforcement in the rounds,
``fedlora privacy-report``, secure aggregation.
"""
