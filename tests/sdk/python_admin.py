"""The official Python `openai` SDK's admin resources against tokenwarden.

Run by tests/it/admin.rs, which starts the gateway (org "acme", project
"web") and a simulated upstream:
    python python_admin.py BASE_URL ORG_ADMIN_KEY PLATFORM_TOKEN
Exits non-zero (with the failing assertion) if a call does not do what it
does against OpenAI's Admin API.
"""

import sys

import openai

base_url, org_admin, platform = sys.argv[1:4]
admin = openai.OpenAI(base_url=base_url, api_key="unused", admin_api_key=org_admin, max_retries=0)
org = admin.admin.organization
hello = [{"role": "user", "content": "Hello!"}]


def refused(call, error):
    try:
        call()
    except error:
        return
    raise AssertionError(f"expected {error.__name__}")


# Projects: the configured one, then one made here.
assert [p.id for p in org.projects.list().data] == ["web"]
created = org.projects.create(name="Research")
assert created.object == "organization.project" and created.id.startswith("proj_"), created
assert created.name == "Research" and created.status == "active" and created.archived_at is None
assert org.projects.retrieve(created.id).id == created.id
assert org.projects.update(created.id, name="Research 2").name == "Research 2"
assert {p.id for p in org.projects.list().data} == {"web", created.id}
refused(lambda: org.projects.retrieve("proj_nope"), openai.NotFoundError)

# A service account's key: its value once, then working at once.
account = org.projects.service_accounts.create(created.id, name="ci")
assert account.object == "organization.project.service_account" and account.name == "ci"
value = account.api_key.value
assert value.startswith("tw-") and account.api_key.id
client = openai.OpenAI(base_url=base_url, api_key=value, max_retries=0)
assert client.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=3).usage.completion_tokens == 3

keys = org.projects.api_keys.list(created.id).data
assert [k.id for k in keys] == [account.api_key.id], keys
key = org.projects.api_keys.retrieve(account.api_key.id, project_id=created.id)
assert key.name == "ci" and key.redacted_value != value and value[5:-4] not in key.redacted_value
assert key.owner.type == "service_account" and key.owner.service_account.id == account.id
assert [a.id for a in org.projects.service_accounts.list(created.id).data] == [account.id]
assert org.projects.service_accounts.retrieve(account.id, project_id=created.id).name == "ci"

# Which models the project may call.
allowed = org.projects.model_permissions.update(created.id, mode="allow_list", model_ids=["gpt-4o-mini"])
assert allowed.mode == "allow_list" and allowed.api_model_ids == ["gpt-4o-mini"]
refused(lambda: client.chat.completions.create(model="gpt-4o", messages=hello, max_tokens=3), openai.PermissionDeniedError)
assert [m.id for m in client.models.list().data] == ["gpt-4o-mini"]
assert org.projects.model_permissions.delete(created.id).deleted
assert client.chat.completions.create(model="gpt-4o", messages=hello, max_tokens=3).usage.completion_tokens == 3

# A deleted key stops working at the next call.
assert org.projects.api_keys.delete(account.api_key.id, project_id=created.id).deleted
refused(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=3), openai.AuthenticationError)

# An archived project's keys stop working.
second = org.projects.service_accounts.create(created.id, name="second")
other = openai.OpenAI(base_url=base_url, api_key=second.api_key.value, max_retries=0)
other.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=3)
archived = org.projects.archive(created.id)
assert archived.status == "archived" and archived.archived_at
refused(lambda: other.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=3), openai.AuthenticationError)
assert [p.id for p in org.projects.list().data] == ["web"]

# Admin keys: made and deleted with the platform's token, not an org's key.
refused(lambda: org.admin_api_keys.create(name="mine"), openai.PermissionDeniedError)
platform_client = openai.OpenAI(
    base_url=base_url, api_key="unused", admin_api_key=platform, organization="acme", max_retries=0
)
made = platform_client.admin.organization.admin_api_keys.create(name="ops")
assert made.object == "organization.admin_api_key" and made.value and made.name == "ops"
ops = openai.OpenAI(base_url=base_url, api_key="unused", admin_api_key=made.value, max_retries=0)
assert {p.id for p in ops.admin.organization.projects.list().data} == {"web"}
assert made.id in [k.id for k in org.admin_api_keys.list().data]
assert platform_client.admin.organization.admin_api_keys.delete(made.id).deleted
refused(lambda: ops.admin.organization.projects.list(), openai.AuthenticationError)

print("python admin sdk ok")
