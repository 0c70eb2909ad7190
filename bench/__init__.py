"""Load tests of the served model, run from the checkout and never part of the serving image: the serving
benchmark beside its KServe peer (serve, kserve_peer, wrk_post.lua; make bench-serve) and the soak (soak,
wrk_soak.lua; make soak)."""
