"""``python -m visionpipe.config > params.schema.json``: print the JSON Schema of params.yaml."""

import sys

from visionpipe.config.schema import params_json_schema_text

if __name__ == "__main__":
    sys.stdout.write(params_json_schema_text())
