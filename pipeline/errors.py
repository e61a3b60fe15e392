"""Errors a user can act on.

Every error the pipeline raises for bad input or a bad environment is a
PipelineError whose message is one line: what is wrong (the file, the value)
and what to do about it. The CLI prints that line and exits 1, never a
traceback. Warnings (PipelineWarning) are one line too: the run goes on, slower
or poorer than it could be, and the line says why.
"""


class PipelineError(Exception):
    """Base class: the message says what is wrong and what to do."""


class DataError(PipelineError):
    """The data set cannot be read as asked (layout, labels, files)."""


class WeightsError(PipelineError):
    """Backbone weights cannot be obtained or do not fit the model."""


class ModelError(PipelineError):
    """Unknown model, layer tap or pooling."""


class CacheError(PipelineError):
    """A feature cache or head file cannot be used."""


class IncompleteCacheError(CacheError):
    """Extraction into this cache was interrupted; re-running it resumes."""


class StaleCacheError(CacheError):
    """The cache was made from other data or settings than asked for."""


class ImageDecodeError(DataError):
    """One image cannot be read or decoded; the message is the short reason it is skipped."""


class PipelineWarning(UserWarning):
    """The run goes on, but slower or poorer than it could: the message says why and what to do."""
