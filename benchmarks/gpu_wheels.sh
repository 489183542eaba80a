#!/usr/bin/env bash
# Wheels for a bare GPU image that has torch, lightning, tokenizers, transformers, numpy, pandas, pyarrow and pyyaml
# but not this project's other packages (none can be fetched there): run this on a machine with a network, from
# the repo root; it puts them in .whl/ (git-ignored, about 35 MB), which benchmarks/gpu_check.sh installs into a
# temporary folder (--no-deps: exactly these). Versions are requirements.txt's resolved pins; Python 3.12 x86-64.
# Checked 2026-11-30 on CPU: with only the GPU image's listed packages and these wheels (their Python 3.11 builds)
# on the path, `clex prepare`, `clex pretrain` and `clex evaluate base` ran (a tiny profile); not yet on the GPU.
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PKGS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5          # clex/config.py
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19                                               # clex prepare
  mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1   # tracking (sqlite)
  mako==1.4.3 sqlparse==0.6.1 cachetools==7.3.3 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5
  pyasn1-modules==0.4.2 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 importlib-metadata==9.1.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
  python-dotenv==1.2.4 fastapi==0.165.0 starlette==1.10.0 graphene==3.4.3 graphql-core==3.2.14 graphql-relay==3.2.0
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12                                                # mlflow's sqlite store
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  -d .whl "${PKGS[@]}"
du -sh .whl
