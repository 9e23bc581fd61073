#!/bin/sh
# Entry point of the LOIRE image. An endpoint variable set to "" by compose (`${S3_ENDPOINT_URL:-}` with real
# AWS) must be unset: MLflow and code passing os.environ values to boto3 would use "" as the endpoint. Empty
# keys are dropped too, so boto3 goes on to the instance role.
set -eu
for name in AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_ENDPOINT_URL_SQS MLFLOW_S3_ENDPOINT_URL \
    AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
    eval "value=\${$name-}"
    if [ -z "$value" ]; then
        unset "$name"
    fi
done
exec "$@"
