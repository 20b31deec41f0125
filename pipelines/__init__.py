"""MLflow-tracked pipelines around the cvae core: data, training, tuning, evaluation, reproduction.

Messages go to the ``pipelines`` loggers; as a library it shows none until you configure logging
(the commands show them on stderr: ``pipelines.entrypoints.logs``).
"""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
