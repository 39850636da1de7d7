# The image of Tally's processes (gateway, processor, jobs worker, alert evaluator) for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tally tally
COPY deploy/migrations deploy/migrations
COPY deploy/local/secrets.sh deploy/local/secrets.sh
# /state: the compose volume that keeps the secrets deploy/local/secrets.sh makes once
RUN pip install --no-cache-dir . && useradd --system tally && mkdir /state && chown tally /state
ENV TALLY_MIGRATIONS_DIR=/app/deploy/migrations
USER tally
EXPOSE 8080
CMD ["tally", "gateway", "--host", "0.0.0.0"]
