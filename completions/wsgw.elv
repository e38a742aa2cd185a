
use builtin;
use str;

set edit:completion:arg-completer[wsgw] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'wsgw'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'wsgw'= {
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
            cand serve 'Run the gateway daemon'
            cand token 'Print a connection URL with a fresh token for one identity'
            cand send 'Publish one message with a broker confirm and print its messageId (RabbitMQ with --amqp-url, else the gateway''s HTTP API)'
            cand listen 'Connect as a client, print each message received, and ack it'
            cand sessions 'List the live sessions of every node, or close one with --kick'
            cand replay-dlq 'Inspect, re-deliver or purge the messages in the dead-letter queue (RabbitMQ only)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'wsgw;serve'= {
            cand --listen 'Address and port to listen on [default: 127.0.0.1:8086]'
            cand --public-url 'Base URL that token responses point clients at, such as wss://push.example.com [default: ws://<listen>, or wss://<listen> when server.tls_cert is set]'
            cand --node-name 'Name of this node [default: <hostname>-<random>]'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand --check 'Check the configuration (file, environment and flags), report every invalid key, and exit'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;token'= {
            cand --unique-id 'The client''s uniqueId, such as order-8812'
            cand --client-type 'The client''s type, such as h5 or charger'
            cand --tags 'Tags carried by the token, for broadcasts (comma-separated)'
            cand --businesses 'Businesses carried by the token, for broadcasts (comma-separated)'
            cand --ttl 'Token lifetime, such as 60s or 5m [default: auth.token_ttl, 60s]'
            cand --ca-cert 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;send'= {
            cand --to 'Recipient uniqueId; without --to-client-type the message reaches every client type of it'
            cand --to-client-type 'Recipient clientType'
            cand --business-type 'Business the message belongs to, such as payment or qrcode'
            cand --message-type 'Event within the business, such as PAYMENT_SUCCEEDED or QR_REFRESH'
            cand --content 'Message content as JSON, such as ''{"orderId":"8812"}'''
            cand --content-file 'Read the JSON content from a file, or from standard input with -'
            cand --message-id 'Keep this messageId instead of assigning one, so retries de-duplicate'
            cand --from-unique-id 'Sender uniqueId to put in the envelope'
            cand --from-client-type 'Sender clientType to put in the envelope'
            cand --tags 'Tags (comma-separated); without --to the message is a broadcast to clients whose token has any of them'
            cand --businesses 'Businesses (comma-separated); without --to the message is a broadcast to clients whose token has any'
            cand --send-type 'sendType of the envelope'
            cand --wait 'Wait until a client acked the message and print the receipt; exit 75 if none did in time (the message stays queued)'
            cand --ca-cert 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;listen'= {
            cand --unique-id 'The client''s uniqueId, such as order-8812'
            cand --client-type 'The client''s type, such as h5 or charger'
            cand --tags 'Tags carried by the token, for broadcasts (comma-separated)'
            cand --businesses 'Businesses carried by the token, for broadcasts (comma-separated)'
            cand --ttl 'Token lifetime, such as 60s or 5m [default: auth.token_ttl, 60s]'
            cand --count 'Exit after this many messages'
            cand --ca-cert 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand --no-ack 'Print messages without acking them, so they stay in the mailbox and come again on the next connection'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;sessions'= {
            cand --unique-id 'Only sessions of this uniqueId'
            cand --client-type 'Only sessions of this clientType'
            cand --node 'Only sessions on this node'
            cand --sort 'Sort order'
            cand --kick 'Close this session with the close code that makes clients reconnect later'
            cand --timeout 'How long to wait for the nodes'' replies'
            cand --ca-cert 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway''s certificate (the built-in webpki roots stay trusted)'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;replay-dlq'= {
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
            cand list 'List dead-lettered messages without consuming them'
            cand show 'Print one dead-lettered message whole'
            cand replay 'Re-publish matching messages to their original destination, removing each after the broker confirmed'
            cand purge 'Delete matching messages from the dead-letter queue'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'wsgw;replay-dlq;list'= {
            cand --business-type 'Only messages of this businessType'
            cand --message-type 'Only messages of this messageType'
            cand --to 'Only messages to this uniqueId, or uniqueId/clientType'
            cand --reason 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit'
            cand --older-than 'Only messages dead-lettered longer ago than this, such as 1h'
            cand --newer-than 'Only messages dead-lettered within this time, such as 30m'
            cand --id 'Only the message with this messageId'
            cand --limit 'At most this many matching messages'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;replay-dlq;show'= {
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;replay-dlq;replay'= {
            cand --business-type 'Only messages of this businessType'
            cand --message-type 'Only messages of this messageType'
            cand --to 'Only messages to this uniqueId, or uniqueId/clientType'
            cand --reason 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit'
            cand --older-than 'Only messages dead-lettered longer ago than this, such as 1h'
            cand --newer-than 'Only messages dead-lettered within this time, such as 30m'
            cand --id 'Only the message with this messageId'
            cand --limit 'At most this many matching messages'
            cand --max-replays 'Skip messages already replayed this many times'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand --dry-run 'Show what would be replayed without publishing or removing anything'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;replay-dlq;purge'= {
            cand --business-type 'Only messages of this businessType'
            cand --message-type 'Only messages of this messageType'
            cand --to 'Only messages to this uniqueId, or uniqueId/clientType'
            cand --reason 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit'
            cand --older-than 'Only messages dead-lettered longer ago than this, such as 1h'
            cand --newer-than 'Only messages dead-lettered within this time, such as 30m'
            cand --id 'Only the message with this messageId'
            cand --limit 'At most this many matching messages'
            cand --config 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]'
            cand --server 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]'
            cand --amqp-url 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f'
            cand --api-key 'API key for the gateway''s token endpoint and HTTP API'
            cand --output 'Output format [default: table on a terminal, json otherwise]'
            cand --log-format 'Log format on stderr'
            cand --yes 'Do not ask for confirmation (required when standard input is not a terminal)'
            cand -v 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand --verbose 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
            cand -q 'Less log output on stderr (errors only)'
            cand --quiet 'Less log output on stderr (errors only)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'wsgw;replay-dlq;help'= {
            cand list 'List dead-lettered messages without consuming them'
            cand show 'Print one dead-lettered message whole'
            cand replay 'Re-publish matching messages to their original destination, removing each after the broker confirmed'
            cand purge 'Delete matching messages from the dead-letter queue'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'wsgw;replay-dlq;help;list'= {
        }
        &'wsgw;replay-dlq;help;show'= {
        }
        &'wsgw;replay-dlq;help;replay'= {
        }
        &'wsgw;replay-dlq;help;purge'= {
        }
        &'wsgw;replay-dlq;help;help'= {
        }
        &'wsgw;help'= {
            cand serve 'Run the gateway daemon'
            cand token 'Print a connection URL with a fresh token for one identity'
            cand send 'Publish one message with a broker confirm and print its messageId (RabbitMQ with --amqp-url, else the gateway''s HTTP API)'
            cand listen 'Connect as a client, print each message received, and ack it'
            cand sessions 'List the live sessions of every node, or close one with --kick'
            cand replay-dlq 'Inspect, re-deliver or purge the messages in the dead-letter queue (RabbitMQ only)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'wsgw;help;serve'= {
        }
        &'wsgw;help;token'= {
        }
        &'wsgw;help;send'= {
        }
        &'wsgw;help;listen'= {
        }
        &'wsgw;help;sessions'= {
        }
        &'wsgw;help;replay-dlq'= {
            cand list 'List dead-lettered messages without consuming them'
            cand show 'Print one dead-lettered message whole'
            cand replay 'Re-publish matching messages to their original destination, removing each after the broker confirmed'
            cand purge 'Delete matching messages from the dead-letter queue'
        }
        &'wsgw;help;replay-dlq;list'= {
        }
        &'wsgw;help;replay-dlq;show'= {
        }
        &'wsgw;help;replay-dlq;replay'= {
        }
        &'wsgw;help;replay-dlq;purge'= {
        }
        &'wsgw;help;help'= {
        }
    ]
    $completions[$command]
}
