"""The teeflow SDK for task initiators."""

from teeflow.sdk.client import Client
from teeflow.sdk.results import Result

__all__ = ["Client", "Result"]
