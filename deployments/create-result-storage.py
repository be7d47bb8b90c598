"""Create (or update) the result-storage block every worker host reads: shard results on S3/R2.

    python deployments/create-result-storage.py s3://turbo-batch/prefect-results
    # then, in every host's worker.env:
    PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/turbo-batch-results

A shard persists its return value (the metrics rows) and the batch flow, on another host maybe,
reads it back; with several hosts that storage must be one that all of them reach. This saves a
prefect-aws `S3Bucket` block (and its `AwsCredentials`) on the Prefect server from the same R2_*
variables the sink uses (R2_ACCOUNT_ID or R2_ENDPOINT_URL, R2_ACCESS_KEY_ID, R2_SECRET_ACCESS_KEY,
R2_CA_BUNDLE for a private endpoint), with the same client settings as the sink (path-style
addressing, checksums only when required: what R2 accepts). Safe to run again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def save_block(uri: str, name: str, env: dict[str, str], *, region: str = "auto") -> str:
    """Save the block `name` for `s3://bucket/folder`; its slug (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK's value)."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from tasks.upload import r2_credentials
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise SystemExit(f"create-result-storage: {uri!r}: expected s3://bucket[/folder]")
    bucket, _, folder = uri[5:].partition("/")
    creds = r2_credentials(env)
    endpoint = creds.endpoint_url or f"https://{creds.account_id}.r2.cloudflarestorage.com"
    params = AwsClientParameters(
        # verify=True: prefect-aws's default (False) would skip TLS checks and ignore the CA file.
        endpoint_url=endpoint, verify=True, verify_cert_path=env.get("R2_CA_BUNDLE") or None,
        config={"signature_version": "s3v4", "s3": {"addressing_style": "path"},
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
                "retries": {"mode": "standard", "total_max_attempts": 5}})
    credentials = AwsCredentials(aws_access_key_id=creds.access_key_id,
                                 aws_secret_access_key=creds.secret_access_key.get(),
                                 region_name=region, aws_client_parameters=params)
    credentials.save(f"{name}-credentials", overwrite=True)
    S3Bucket(bucket_name=bucket, bucket_folder=folder.strip("/"), credentials=credentials).save(name, overwrite=True)
    return f"s3-bucket/{name}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("uri", help="s3://bucket/folder for the results")
    ap.add_argument("--name", default="turbo-batch-results", help="block name (default turbo-batch-results)")
    ap.add_argument("--region", default="auto", help="signing region: auto for R2 (us-east-1 for some local servers)")
    args = ap.parse_args()
    slug = save_block(args.uri, args.name, dict(os.environ), region=args.region)
    print(f"saved block {slug}; set on every worker host:\nPREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug}")


if __name__ == "__main__":
    main()
