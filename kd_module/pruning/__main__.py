"""``python -m kd_module.pruning REQUEST.pkl``: :func:`~kd_module.pruning.job.prune` with the
keyword arguments pickled in ``REQUEST.pkl`` (how ``distill(student_from="prune")`` runs it in a
fresh single-rank process)."""

import pickle
import sys

from kd_module.guards import USER_ERRORS
from kd_module.pruning.job import prune

if __name__ == "__main__":
    with open(sys.argv[1], "rb") as request:
        arguments = pickle.load(request)
    try:
        prune(**arguments)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
