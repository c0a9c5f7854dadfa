"""An executor pool: one task across several attested executors, on Dask (docs/scale.md).

Each member is an ordinary executor holding a part of every input. seat.py is a member's
side (its pool identity, answering and making appraisals, joining the lead's Dask
scheduler, wiping on the lead's word or when the link ends); lead.py is the first member's
(admit, link, run, conclude). admission.py (pure) appraises a would-be member; identity.py
makes the CA=false member certificates; tls.py and cluster.py pin Dask's links to exactly
the admitted members; held.py keeps a member's parts; compute.py, linreg.py, logreg.py and
sql.py run the computations a pool offers, moving aggregates only. member.py and
rendezvous.py are a standalone development pool (bench/pool.py measures with it).

A pool must never open a link to anything it has not admitted, never accept a plaintext
link, and never run an engine path (XGBoost's collective) that cannot be put on such a link.
"""
