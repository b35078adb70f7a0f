"""The cluster path rehearsed on one machine: chart pods and pipeline tasks as namespaced processes."""

from ttt.rehearse.run import Rehearsal, RehearsalError, rehearse

__all__ = ["Rehearsal", "RehearsalError", "rehearse"]
