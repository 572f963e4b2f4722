#!/usr/bin/python
"""Fails with ``msg`` and ``fem_error_code: code``, as fem.core's modules may."""
from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec={"msg": {"type": "str"}, "code": {"type": "str"}})
    module.fail_json(msg=module.params["msg"], fem_error_code=module.params["code"])


if __name__ == "__main__":
    main()
