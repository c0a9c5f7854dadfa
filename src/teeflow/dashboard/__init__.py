"""`teeflow dashboard`: a party's own web pages over its own key, on loopback only.

The scheduler is not trusted to render the truth: pages are built here, from answers the
CLI's client checks against this party's log checkpoint, and the log entries each page
shows are verified here first. Results are opened here, with this party's key only.
"""
