"""Airflow side of OpenSubject: operators that hand stages to the Celery workers and the
triggers that wait for them in the triggerer, plus the dataset dashboard plugin.

This folder is Airflow's plugins folder, which every Airflow component (scheduler,
dag-processor, triggerer, api-server, workers) puts on ``sys.path``.
"""
