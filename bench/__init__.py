"""Benchmarks run from the checkout and never part of the serving image: the serving benchmark beside its KServe
peer (serve, kserve_peer, wrk_post.lua; make bench-serve), the soak (soak, wrk_soak.lua; make soak), and training
speed on one rank and on several (train; make bench-train)."""
