"""The pipeline's one retry mechanism (flows/retry.py): what is transient, and the backoff."""

import httpx
import pytest
import requests
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from mlflow.exceptions import MlflowException, RestException

from flows.retry import RetryPolicy, is_transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def http_status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://x")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionError("refused"), True),
        (TimeoutError(), True),
        (requests.ConnectionError("refused"), True),
        (httpx.ConnectTimeout("slow"), True),
        (http_status_error(503), True),
        (http_status_error(404), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (client_error("SlowDown", 503), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("AccessDenied", 403), False),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "503"}), True),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}), False),
        (MlflowException("API request to http://x/api failed with exception Connection refused"), True),
        (MlflowException("Both `artifact_path` and `name` were given"), False),
        (FileNotFoundError("stage.json"), False),
        (NoCredentialsError(), False),
        (ValueError("bad parameters"), False),
    ],
)
def test_one_definition_of_transient(exc: BaseException, expected: bool) -> None:
    assert is_transient(exc) is expected


def test_policy_retries_transient_errors_then_reraises_the_last() -> None:
    calls: list[float] = []
    sleeps: list[float] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionError(f"refused {len(calls)}")

    policy = RetryPolicy(attempts=4, initial_delay_s=1, max_delay_s=3)
    with pytest.raises(ConnectionError, match="refused 4"):
        policy.call(down, what="down", sleep=sleeps.append)
    assert sleeps == list(policy.delays()) == [1, 2, 3]

    calls.clear()
    with pytest.raises(ValueError):
        policy.call(lambda: calls.append(1) or int("x"), what="bad", sleep=sleeps.append)
    assert len(calls) == 1


def test_policy_stops_before_a_sleep_past_max_elapsed() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        RetryPolicy(attempts=100, initial_delay_s=1, max_elapsed_s=0).call(down, what="down", sleep=lambda _: None)
    assert len(calls) == 1


def test_from_env_names_the_variables() -> None:
    assert RetryPolicy.from_env({"LOIRE_MLFLOW_RETRY_ATTEMPTS": "3"}).attempts == 3
    with pytest.raises(ValueError, match="LOIRE_MLFLOW_RETRY_ATTEMPTS='x': not a number"):
        RetryPolicy.from_env({"LOIRE_MLFLOW_RETRY_ATTEMPTS": "x"})
