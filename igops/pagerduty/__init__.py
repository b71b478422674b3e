"""PagerDuty's Events API v2, both halves igops uses: `incidents` pages for `igops check` and
`igops pagerduty` (trigger, resolve, a remembered dedup key per check and target), and
`changes` sends the change events that mark operations and deploys on a service's timeline."""
