# two (or more) servers over one store on S3: run the same command on each machine
AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_REGION=us-east-1 \
mukv serve s3://my-bucket/cams --host 0.0.0.0 --token "$MUKV_SERVE_TOKEN" \
    --backend-options '{"lease_ttl": 30, "clock_skew": 10}'
