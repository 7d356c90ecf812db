"""The dataset dashboard (served by Airflow's api-server through plugins/opensubject_plugin.py)."""
