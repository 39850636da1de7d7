# The gateway and processor image for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tally tally
COPY schemas schemas
COPY ingest ingest
COPY processors processors
COPY sinks sinks
COPY query query
COPY usage usage
COPY billing billing
COPY alerts alerts
COPY deploy/migrations deploy/migrations
RUN pip install --no-cache-dir . && useradd --system tally
ENV TALLY_MIGRATIONS_DIR=/app/deploy/migrations
USER tally
EXPOSE 8080
CMD ["tally", "gateway", "--host", "0.0.0.0"]
