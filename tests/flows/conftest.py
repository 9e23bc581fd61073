"""Fixtures of the pipeline tests: real servers on loopback, started by the tests that need them."""

from tests.flows.servers_aws import *  # noqa: F403
from tests.flows.servers_mlflow import *  # noqa: F403
