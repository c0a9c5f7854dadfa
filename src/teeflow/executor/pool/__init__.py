"""An executor pool: one task across several attested executors, on Dask.

The foundation only (issue 11): member identities (identity.py), admission by every member
of every other (admission.py, pure), Dask links pinned to exactly the admitted members'
certificates (tls.py, cluster.py), the exchange that carries certificates, nonces and
evidence between members (rendezvous.py, untrusted), one computation on the pool
(linreg.py) and the member process (member.py). Specs, providers and the scheduler do not
know about pools yet.

A pool must never open a link to anything it has not admitted, never accept a plaintext
link, and never run an engine path (XGBoost's collective) that cannot be put on such a link.
"""
