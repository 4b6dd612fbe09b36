"""Billing: plans, budgets, metering, webhooks, receipts (CHECKLIST P1-P4)."""
