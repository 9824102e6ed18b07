"""`cmboost demo`: what it runs (plan), the shipped files it reads (assets), the run itself (run), its
verdicts (verdicts), its report (report) and the compute it counts (flops)."""
