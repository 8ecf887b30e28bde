# The one image every compose service runs: ingest (default), migrate, worker, beat, flower.
FROM python:3.11-slim

# Inside a container the ingest must listen beyond loopback, and beat writes only to /tmp.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GUNICORN_BIND=0.0.0.0:8000 \
    BEAT_SCHEDULE_FILE=/tmp/celerybeat-schedule

WORKDIR /app
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app

# Dependencies in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself, without touching the dependencies; the source is then removed so
# there is one copy of the code (site-packages, byte-compiled: the root file system may be
# read-only).
COPY README.md ./
COPY shared ./shared
COPY ingest ./ingest
COPY workers ./workers
COPY cli ./cli
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info shared ingest workers cli README.md pyproject.toml

# Read from the working directory by gunicorn and by `celery -A workers flower`.
COPY gunicorn.conf.py flowerconfig.py ./

USER app
EXPOSE 8000 5555
CMD ["gunicorn", "ingest:create_app()"]
