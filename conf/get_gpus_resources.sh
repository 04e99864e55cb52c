#!/usr/bin/env bash
# Spark GPU discovery script: prints the executor's GPUs as {"name": "gpu", "addresses": [...]}.
# Ship it to executors (spark-submit --files conf/get_gpus_resources.sh) or install it on each node.
addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e ':a' -e 'N' -e '$!ba' \
  -e 's/\n/","/g')
echo "{\"name\": \"gpu\", \"addresses\": [\"${addresses}\"]}"
