"""The teeflow SDK for task initiators."""

from teeflow.sdk.client import Client, Result

__all__ = ["Client", "Result"]
