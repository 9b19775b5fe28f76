#!/bin/sh
rm -rf /opt/app
