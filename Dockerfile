FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY metering metering
COPY producers producers
COPY streams streams
COPY sinks sinks
COPY schemas schemas
RUN pip install --no-cache-dir .
ENTRYPOINT []
