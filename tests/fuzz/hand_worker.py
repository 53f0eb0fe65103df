"""A placeholder worker process: it writes the environment the node agent gave it (its id,
token and the four URL templates) to $DUMP_DIR/<worker id>.json and sleeps, so a test can
speak the worker protocol in its place."""

import json
import os
import time

path = os.path.join(os.environ["DUMP_DIR"], os.environ["RUNPOD_POD_ID"] + ".json")
with open(path + ".tmp", "w") as fh:
    json.dump(dict(os.environ), fh)
os.rename(path + ".tmp", path)
while True:
    time.sleep(3600)
