"""Typed errors: every user-facing failure is an XllmError whose message says what is wrong
and what to do. The CLI prints it as one line and exits 2; the server maps it to a 4xx."""

from __future__ import annotations


class XllmError(Exception):
    """Base class of every error a user can cause (bad input, bad files, bad flags)."""


class ConfigError(XllmError):
    """A config value (config.json field, CLI flag, request parameter) is invalid."""


class UnsupportedModelError(XllmError):
    """The model family, rope type or checkpoint layout is not supported."""


class WeightError(XllmError):
    """A checkpoint is missing, corrupt, or its tensors do not match the model."""


class ArtifactError(XllmError):
    """A compiled artifact is missing, truncated, tampered with, or from another version."""


class PassError(XllmError):
    """A compiler pass failed or changed the numerics beyond tolerance."""


class BackendUnavailableError(XllmError):
    """The requested device backend (cuda, npu) is not available on this machine."""


class RequestError(XllmError):
    """A generation request is invalid (prompt too long, bad sampling parameters)."""
