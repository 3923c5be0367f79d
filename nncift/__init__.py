"""nncift: distributed NN-CIFT (neural-network influence estimation for instruction-tuning data).

Public API: :class:`RunConfig` / :func:`load_config`, :class:`Runner` (runs the stages of a run directory),
:class:`InfluenceNetwork`, :func:`select_subset`, and :func:`nncift.influence.register` for new teachers.
"""

from nncift.config import RunConfig, load_config
from nncift.network import InfluenceNetwork
from nncift.runner import Runner
from nncift.select import select_subset

__version__ = "0.1.0"
__all__ = ["InfluenceNetwork", "RunConfig", "Runner", "__version__", "load_config", "select_subset"]
