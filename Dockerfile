# livectr stages for docker-compose. One image, one command per stage.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# Pin torch first so the project's torch range is already satisfied (choose a CPU or CUDA build here).
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY livectr ./livectr
COPY streams ./streams
COPY learner ./learner
COPY semantic_cache ./semantic_cache
COPY simulators ./simulators
RUN pip install .
ENTRYPOINT ["livectr"]
