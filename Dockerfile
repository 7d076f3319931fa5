# livectr stages for docker-compose. One image, one command per stage.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# Pin torch first so the project's torch range is already satisfied. The default index is
# PyTorch's CPU wheels (PyPI's torch is a multi-GB CUDA build); for a GPU image build with
#   docker compose build --build-arg TORCH_INDEX=https://pypi.org/simple
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY livectr ./livectr
COPY streams ./streams
COPY learner ./learner
COPY semantic_cache ./semantic_cache
COPY simulators ./simulators
RUN pip install .
ENTRYPOINT ["livectr"]
