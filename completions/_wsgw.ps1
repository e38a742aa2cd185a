
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'wsgw' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'wsgw'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'wsgw' {
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('serve', 'serve', [CompletionResultType]::ParameterValue, 'Run the gateway daemon')
            [CompletionResult]::new('token', 'token', [CompletionResultType]::ParameterValue, 'Print a connection URL with a fresh token for one identity')
            [CompletionResult]::new('send', 'send', [CompletionResultType]::ParameterValue, 'Publish one message with a broker confirm and print its messageId (RabbitMQ with --amqp-url, else the gateway''s HTTP API)')
            [CompletionResult]::new('listen', 'listen', [CompletionResultType]::ParameterValue, 'Connect as a client, print each message received, and ack it')
            [CompletionResult]::new('sessions', 'sessions', [CompletionResultType]::ParameterValue, 'List the live sessions of every node, or close one with --kick')
            [CompletionResult]::new('replay-dlq', 'replay-dlq', [CompletionResultType]::ParameterValue, 'Inspect, re-deliver or purge the messages in the dead-letter queue (RabbitMQ only)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'wsgw;serve' {
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'Address and port to listen on [default: 127.0.0.1:8086]')
            [CompletionResult]::new('--public-url', '--public-url', [CompletionResultType]::ParameterName, 'Base URL that token responses point clients at, such as wss://push.example.com [default: ws://<listen>, or wss://<listen> when server.tls_cert is set]')
            [CompletionResult]::new('--node-name', '--node-name', [CompletionResultType]::ParameterName, 'Name of this node [default: <hostname>-<random>]')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--check', '--check', [CompletionResultType]::ParameterName, 'Check the configuration (file, environment and flags), report every invalid key, and exit')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;token' {
            [CompletionResult]::new('--unique-id', '--unique-id', [CompletionResultType]::ParameterName, 'The client''s uniqueId, such as order-8812')
            [CompletionResult]::new('--client-type', '--client-type', [CompletionResultType]::ParameterName, 'The client''s type, such as h5 or charger')
            [CompletionResult]::new('--tags', '--tags', [CompletionResultType]::ParameterName, 'Tags carried by the token, for broadcasts (comma-separated)')
            [CompletionResult]::new('--businesses', '--businesses', [CompletionResultType]::ParameterName, 'Businesses carried by the token, for broadcasts (comma-separated)')
            [CompletionResult]::new('--ttl', '--ttl', [CompletionResultType]::ParameterName, 'Token lifetime, such as 60s or 5m [default: auth.token_ttl, 60s]')
            [CompletionResult]::new('--ca-cert', '--ca-cert', [CompletionResultType]::ParameterName, 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;send' {
            [CompletionResult]::new('--to', '--to', [CompletionResultType]::ParameterName, 'Recipient uniqueId; without --to-client-type the message reaches every client type of it')
            [CompletionResult]::new('--to-client-type', '--to-client-type', [CompletionResultType]::ParameterName, 'Recipient clientType')
            [CompletionResult]::new('--business-type', '--business-type', [CompletionResultType]::ParameterName, 'Business the message belongs to, such as payment or qrcode')
            [CompletionResult]::new('--message-type', '--message-type', [CompletionResultType]::ParameterName, 'Event within the business, such as PAYMENT_SUCCEEDED or QR_REFRESH')
            [CompletionResult]::new('--content', '--content', [CompletionResultType]::ParameterName, 'Message content as JSON, such as ''{"orderId":"8812"}''')
            [CompletionResult]::new('--content-file', '--content-file', [CompletionResultType]::ParameterName, 'Read the JSON content from a file, or from standard input with -')
            [CompletionResult]::new('--message-id', '--message-id', [CompletionResultType]::ParameterName, 'Keep this messageId instead of assigning one, so retries de-duplicate')
            [CompletionResult]::new('--from-unique-id', '--from-unique-id', [CompletionResultType]::ParameterName, 'Sender uniqueId to put in the envelope')
            [CompletionResult]::new('--from-client-type', '--from-client-type', [CompletionResultType]::ParameterName, 'Sender clientType to put in the envelope')
            [CompletionResult]::new('--tags', '--tags', [CompletionResultType]::ParameterName, 'Tags (comma-separated); without --to the message is a broadcast to clients whose token has any of them')
            [CompletionResult]::new('--businesses', '--businesses', [CompletionResultType]::ParameterName, 'Businesses (comma-separated); without --to the message is a broadcast to clients whose token has any')
            [CompletionResult]::new('--send-type', '--send-type', [CompletionResultType]::ParameterName, 'sendType of the envelope')
            [CompletionResult]::new('--wait', '--wait', [CompletionResultType]::ParameterName, 'Wait until a client acked the message and print the receipt; exit 75 if none did in time (the message stays queued)')
            [CompletionResult]::new('--ca-cert', '--ca-cert', [CompletionResultType]::ParameterName, 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;listen' {
            [CompletionResult]::new('--unique-id', '--unique-id', [CompletionResultType]::ParameterName, 'The client''s uniqueId, such as order-8812')
            [CompletionResult]::new('--client-type', '--client-type', [CompletionResultType]::ParameterName, 'The client''s type, such as h5 or charger')
            [CompletionResult]::new('--tags', '--tags', [CompletionResultType]::ParameterName, 'Tags carried by the token, for broadcasts (comma-separated)')
            [CompletionResult]::new('--businesses', '--businesses', [CompletionResultType]::ParameterName, 'Businesses carried by the token, for broadcasts (comma-separated)')
            [CompletionResult]::new('--ttl', '--ttl', [CompletionResultType]::ParameterName, 'Token lifetime, such as 60s or 5m [default: auth.token_ttl, 60s]')
            [CompletionResult]::new('--count', '--count', [CompletionResultType]::ParameterName, 'Exit after this many messages')
            [CompletionResult]::new('--ca-cert', '--ca-cert', [CompletionResultType]::ParameterName, 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--no-ack', '--no-ack', [CompletionResultType]::ParameterName, 'Print messages without acking them, so they stay in the mailbox and come again on the next connection')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;sessions' {
            [CompletionResult]::new('--unique-id', '--unique-id', [CompletionResultType]::ParameterName, 'Only sessions of this uniqueId')
            [CompletionResult]::new('--client-type', '--client-type', [CompletionResultType]::ParameterName, 'Only sessions of this clientType')
            [CompletionResult]::new('--node', '--node', [CompletionResultType]::ParameterName, 'Only sessions on this node')
            [CompletionResult]::new('--sort', '--sort', [CompletionResultType]::ParameterName, 'Sort order')
            [CompletionResult]::new('--kick', '--kick', [CompletionResultType]::ParameterName, 'Close this session with the close code that makes clients reconnect later')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'How long to wait for the nodes'' replies')
            [CompletionResult]::new('--ca-cert', '--ca-cert', [CompletionResultType]::ParameterName, 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;replay-dlq' {
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List dead-lettered messages without consuming them')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Print one dead-lettered message whole')
            [CompletionResult]::new('replay', 'replay', [CompletionResultType]::ParameterValue, 'Re-publish matching messages to their original destination, removing each after the broker confirmed')
            [CompletionResult]::new('purge', 'purge', [CompletionResultType]::ParameterValue, 'Delete matching messages from the dead-letter queue')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'wsgw;replay-dlq;list' {
            [CompletionResult]::new('--business-type', '--business-type', [CompletionResultType]::ParameterName, 'Only messages of this businessType')
            [CompletionResult]::new('--message-type', '--message-type', [CompletionResultType]::ParameterName, 'Only messages of this messageType')
            [CompletionResult]::new('--to', '--to', [CompletionResultType]::ParameterName, 'Only messages to this uniqueId, or uniqueId/clientType')
            [CompletionResult]::new('--reason', '--reason', [CompletionResultType]::ParameterName, 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit')
            [CompletionResult]::new('--older-than', '--older-than', [CompletionResultType]::ParameterName, 'Only messages dead-lettered longer ago than this, such as 1h')
            [CompletionResult]::new('--newer-than', '--newer-than', [CompletionResultType]::ParameterName, 'Only messages dead-lettered within this time, such as 30m')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Only the message with this messageId')
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'At most this many matching messages')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;replay-dlq;show' {
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;replay-dlq;replay' {
            [CompletionResult]::new('--business-type', '--business-type', [CompletionResultType]::ParameterName, 'Only messages of this businessType')
            [CompletionResult]::new('--message-type', '--message-type', [CompletionResultType]::ParameterName, 'Only messages of this messageType')
            [CompletionResult]::new('--to', '--to', [CompletionResultType]::ParameterName, 'Only messages to this uniqueId, or uniqueId/clientType')
            [CompletionResult]::new('--reason', '--reason', [CompletionResultType]::ParameterName, 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit')
            [CompletionResult]::new('--older-than', '--older-than', [CompletionResultType]::ParameterName, 'Only messages dead-lettered longer ago than this, such as 1h')
            [CompletionResult]::new('--newer-than', '--newer-than', [CompletionResultType]::ParameterName, 'Only messages dead-lettered within this time, such as 30m')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Only the message with this messageId')
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'At most this many matching messages')
            [CompletionResult]::new('--max-replays', '--max-replays', [CompletionResultType]::ParameterName, 'Skip messages already replayed this many times')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Show what would be replayed without publishing or removing anything')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;replay-dlq;purge' {
            [CompletionResult]::new('--business-type', '--business-type', [CompletionResultType]::ParameterName, 'Only messages of this businessType')
            [CompletionResult]::new('--message-type', '--message-type', [CompletionResultType]::ParameterName, 'Only messages of this messageType')
            [CompletionResult]::new('--to', '--to', [CompletionResultType]::ParameterName, 'Only messages to this uniqueId, or uniqueId/clientType')
            [CompletionResult]::new('--reason', '--reason', [CompletionResultType]::ParameterName, 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit')
            [CompletionResult]::new('--older-than', '--older-than', [CompletionResultType]::ParameterName, 'Only messages dead-lettered longer ago than this, such as 1h')
            [CompletionResult]::new('--newer-than', '--newer-than', [CompletionResultType]::ParameterName, 'Only messages dead-lettered within this time, such as 30m')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Only the message with this messageId')
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'At most this many matching messages')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]')
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]')
            [CompletionResult]::new('--amqp-url', '--amqp-url', [CompletionResultType]::ParameterName, 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for the gateway''s token endpoint and HTTP API')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format [default: table on a terminal, json otherwise]')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (required when standard input is not a terminal)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Less log output on stderr (errors only)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'wsgw;replay-dlq;help' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List dead-lettered messages without consuming them')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Print one dead-lettered message whole')
            [CompletionResult]::new('replay', 'replay', [CompletionResultType]::ParameterValue, 'Re-publish matching messages to their original destination, removing each after the broker confirmed')
            [CompletionResult]::new('purge', 'purge', [CompletionResultType]::ParameterValue, 'Delete matching messages from the dead-letter queue')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'wsgw;replay-dlq;help;list' {
            break
        }
        'wsgw;replay-dlq;help;show' {
            break
        }
        'wsgw;replay-dlq;help;replay' {
            break
        }
        'wsgw;replay-dlq;help;purge' {
            break
        }
        'wsgw;replay-dlq;help;help' {
            break
        }
        'wsgw;help' {
            [CompletionResult]::new('serve', 'serve', [CompletionResultType]::ParameterValue, 'Run the gateway daemon')
            [CompletionResult]::new('token', 'token', [CompletionResultType]::ParameterValue, 'Print a connection URL with a fresh token for one identity')
            [CompletionResult]::new('send', 'send', [CompletionResultType]::ParameterValue, 'Publish one message with a broker confirm and print its messageId (RabbitMQ with --amqp-url, else the gateway''s HTTP API)')
            [CompletionResult]::new('listen', 'listen', [CompletionResultType]::ParameterValue, 'Connect as a client, print each message received, and ack it')
            [CompletionResult]::new('sessions', 'sessions', [CompletionResultType]::ParameterValue, 'List the live sessions of every node, or close one with --kick')
            [CompletionResult]::new('replay-dlq', 'replay-dlq', [CompletionResultType]::ParameterValue, 'Inspect, re-deliver or purge the messages in the dead-letter queue (RabbitMQ only)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'wsgw;help;serve' {
            break
        }
        'wsgw;help;token' {
            break
        }
        'wsgw;help;send' {
            break
        }
        'wsgw;help;listen' {
            break
        }
        'wsgw;help;sessions' {
            break
        }
        'wsgw;help;replay-dlq' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List dead-lettered messages without consuming them')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Print one dead-lettered message whole')
            [CompletionResult]::new('replay', 'replay', [CompletionResultType]::ParameterValue, 'Re-publish matching messages to their original destination, removing each after the broker confirmed')
            [CompletionResult]::new('purge', 'purge', [CompletionResultType]::ParameterValue, 'Delete matching messages from the dead-letter queue')
            break
        }
        'wsgw;help;replay-dlq;list' {
            break
        }
        'wsgw;help;replay-dlq;show' {
            break
        }
        'wsgw;help;replay-dlq;replay' {
            break
        }
        'wsgw;help;replay-dlq;purge' {
            break
        }
        'wsgw;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
