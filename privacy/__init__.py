"""Privacy: DP-SGD wiring, client-level DP, the privacy ledger, budgets, secure aggregation.

Empty until the privacy and secure-aggregation issues land; the federation loop already
keeps everything a site sends behind one function (the ClientApp's train handler) and the
coordinator's aggregation behind one linear call, which is where they plug in.
"""
