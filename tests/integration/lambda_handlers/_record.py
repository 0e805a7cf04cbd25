"""What every test handler shares: one JSON line per invocation appended to the file named by
$ESMD_TEST_RECORD_FILE (the RIE runs one invocation at a time, so appends never interleave)."""

import json
import os


def record(context, event, **data):
    line = {"request_id": context.aws_request_id, "function_name": context.function_name,
            "remaining_ms": context.get_remaining_time_in_millis(), "event": event}
    line.update(data)
    with open(os.environ["ESMD_TEST_RECORD_FILE"], "a") as f:
        f.write(json.dumps(line, default=repr) + "\n")


def try_model(model, event):
    """Validates event with a Powertools parser model: None when it fits, else the errors."""
    from aws_lambda_powertools.utilities.parser import ValidationError, parse

    try:
        parse(event=event, model=model)
        return None
    except ValidationError as e:
        return e.errors(include_url=False) if hasattr(e, "errors") else str(e)
    except Exception as e:  # noqa: BLE001 - a parser bug is a finding too, report it
        return "%s: %s" % (type(e).__name__, e)
