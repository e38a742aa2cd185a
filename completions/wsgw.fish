# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_wsgw_global_optspecs
    string join \n config= server= amqp-url= api-key= output= v/verbose q/quiet log-format= h/help V/version
end

function __fish_wsgw_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_wsgw_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_wsgw_using_subcommand
    set -l cmd (__fish_wsgw_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c wsgw -n "__fish_wsgw_needs_command" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_needs_command" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_needs_command" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_needs_command" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_needs_command" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_needs_command" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_needs_command" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_needs_command" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c wsgw -n "__fish_wsgw_needs_command" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_needs_command" -f -a "serve" -d 'Run the gateway daemon'
complete -c wsgw -n "__fish_wsgw_needs_command" -f -a "token" -d 'Print a connection URL with a fresh token for one identity'
complete -c wsgw -n "__fish_wsgw_needs_command" -f -a "send" -d 'Publish one message with a broker confirm and print its messageId (RabbitMQ with --amqp-url, else the gateway\'s HTTP API)'
complete -c wsgw -n "__fish_wsgw_needs_command" -f -a "listen" -d 'Connect as a client, print each message received, and ack it'
complete -c wsgw -n "__fish_wsgw_needs_command" -f -a "sessions" -d 'List the live sessions of every node, or close one with --kick'
complete -c wsgw -n "__fish_wsgw_needs_command" -f -a "replay-dlq" -d 'Inspect, re-deliver or purge the messages in the dead-letter queue (RabbitMQ only)'
complete -c wsgw -n "__fish_wsgw_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l listen -d 'Address and port to listen on [default: 127.0.0.1:8086]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l public-url -d 'Base URL that token responses point clients at, such as wss://push.example.com [default: ws://<listen>, or wss://<listen> when server.tls_cert is set]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l node-name -d 'Name of this node [default: <hostname>-<random>]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -l check -d 'Check the configuration (file, environment and flags), report every invalid key, and exit'
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand serve" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l unique-id -d 'The client\'s uniqueId, such as order-8812' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l client-type -d 'The client\'s type, such as h5 or charger' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l tags -d 'Tags carried by the token, for broadcasts (comma-separated)' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l businesses -d 'Businesses carried by the token, for broadcasts (comma-separated)' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l ttl -d 'Token lifetime, such as 60s or 5m [default: auth.token_ttl, 60s]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l ca-cert -d 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway\'s certificate (the built-in webpki roots stay trusted)' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand token" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l to -d 'Recipient uniqueId; without --to-client-type the message reaches every client type of it' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l to-client-type -d 'Recipient clientType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l business-type -d 'Business the message belongs to, such as payment or qrcode' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l message-type -d 'Event within the business, such as PAYMENT_SUCCEEDED or QR_REFRESH' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l content -d 'Message content as JSON, such as \'{"orderId":"8812"}\'' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l content-file -d 'Read the JSON content from a file, or from standard input with -' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l message-id -d 'Keep this messageId instead of assigning one, so retries de-duplicate' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l from-unique-id -d 'Sender uniqueId to put in the envelope' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l from-client-type -d 'Sender clientType to put in the envelope' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l tags -d 'Tags (comma-separated); without --to the message is a broadcast to clients whose token has any of them' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l businesses -d 'Businesses (comma-separated); without --to the message is a broadcast to clients whose token has any' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l send-type -d 'sendType of the envelope' -r -f -a "server-to-client\t''
client-to-client\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l wait -d 'Wait until a client acked the message and print the receipt; exit 75 if none did in time (the message stays queued)' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l ca-cert -d 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway\'s certificate (the built-in webpki roots stay trusted)' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand send" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l unique-id -d 'The client\'s uniqueId, such as order-8812' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l client-type -d 'The client\'s type, such as h5 or charger' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l tags -d 'Tags carried by the token, for broadcasts (comma-separated)' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l businesses -d 'Businesses carried by the token, for broadcasts (comma-separated)' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l ttl -d 'Token lifetime, such as 60s or 5m [default: auth.token_ttl, 60s]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l count -d 'Exit after this many messages' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l ca-cert -d 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway\'s certificate (the built-in webpki roots stay trusted)' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -l no-ack -d 'Print messages without acking them, so they stay in the mailbox and come again on the next connection'
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand listen" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l unique-id -d 'Only sessions of this uniqueId' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l client-type -d 'Only sessions of this clientType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l node -d 'Only sessions on this node' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l sort -d 'Sort order' -r -f -a "connected\t''
unique-id\t''
client-type\t''
node\t''
pending\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l kick -d 'Close this session with the close code that makes clients reconnect later' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l timeout -d 'How long to wait for the nodes\' replies' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l ca-cert -d 'PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA that signed the gateway\'s certificate (the built-in webpki roots stay trusted)' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand sessions" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -f -a "list" -d 'List dead-lettered messages without consuming them'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -f -a "show" -d 'Print one dead-lettered message whole'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -f -a "replay" -d 'Re-publish matching messages to their original destination, removing each after the broker confirmed'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -f -a "purge" -d 'Delete matching messages from the dead-letter queue'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and not __fish_seen_subcommand_from list show replay purge help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l business-type -d 'Only messages of this businessType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l message-type -d 'Only messages of this messageType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l to -d 'Only messages to this uniqueId, or uniqueId/clientType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l reason -d 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l older-than -d 'Only messages dead-lettered longer ago than this, such as 1h' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l newer-than -d 'Only messages dead-lettered within this time, such as 30m' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l id -d 'Only the message with this messageId' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l limit -d 'At most this many matching messages' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from show" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l business-type -d 'Only messages of this businessType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l message-type -d 'Only messages of this messageType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l to -d 'Only messages to this uniqueId, or uniqueId/clientType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l reason -d 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l older-than -d 'Only messages dead-lettered longer ago than this, such as 1h' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l newer-than -d 'Only messages dead-lettered within this time, such as 30m' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l id -d 'Only the message with this messageId' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l limit -d 'At most this many matching messages' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l max-replays -d 'Skip messages already replayed this many times' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -l dry-run -d 'Show what would be replayed without publishing or removing anything'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from replay" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l business-type -d 'Only messages of this businessType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l message-type -d 'Only messages of this messageType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l to -d 'Only messages to this uniqueId, or uniqueId/clientType' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l reason -d 'Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l older-than -d 'Only messages dead-lettered longer ago than this, such as 1h' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l newer-than -d 'Only messages dead-lettered within this time, such as 30m' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l id -d 'Only the message with this messageId' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l limit -d 'At most this many matching messages' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l config -d 'Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]' -r -F
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l server -d 'Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the address of the `wsgw serve` that wrote the local credentials]' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l amqp-url -d 'RabbitMQ URL, such as amqp://user:password@host:5672/%2f' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l api-key -d 'API key for the gateway\'s token endpoint and HTTP API' -r
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l output -d 'Output format [default: table on a terminal, json otherwise]' -r -f -a "table\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -l yes -d 'Do not ask for confirmation (required when standard input is not a terminal)'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -s v -l verbose -d 'More log output on stderr (-v debug, -vv trace); RUST_LOG overrides'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -s q -l quiet -d 'Less log output on stderr (errors only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -s h -l help -d 'Print help'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from purge" -s V -l version -d 'Print version'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from help" -f -a "list" -d 'List dead-lettered messages without consuming them'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from help" -f -a "show" -d 'Print one dead-lettered message whole'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from help" -f -a "replay" -d 'Re-publish matching messages to their original destination, removing each after the broker confirmed'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from help" -f -a "purge" -d 'Delete matching messages from the dead-letter queue'
complete -c wsgw -n "__fish_wsgw_using_subcommand replay-dlq; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and not __fish_seen_subcommand_from serve token send listen sessions replay-dlq help" -f -a "serve" -d 'Run the gateway daemon'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and not __fish_seen_subcommand_from serve token send listen sessions replay-dlq help" -f -a "token" -d 'Print a connection URL with a fresh token for one identity'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and not __fish_seen_subcommand_from serve token send listen sessions replay-dlq help" -f -a "send" -d 'Publish one message with a broker confirm and print its messageId (RabbitMQ with --amqp-url, else the gateway\'s HTTP API)'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and not __fish_seen_subcommand_from serve token send listen sessions replay-dlq help" -f -a "listen" -d 'Connect as a client, print each message received, and ack it'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and not __fish_seen_subcommand_from serve token send listen sessions replay-dlq help" -f -a "sessions" -d 'List the live sessions of every node, or close one with --kick'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and not __fish_seen_subcommand_from serve token send listen sessions replay-dlq help" -f -a "replay-dlq" -d 'Inspect, re-deliver or purge the messages in the dead-letter queue (RabbitMQ only)'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and not __fish_seen_subcommand_from serve token send listen sessions replay-dlq help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and __fish_seen_subcommand_from replay-dlq" -f -a "list" -d 'List dead-lettered messages without consuming them'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and __fish_seen_subcommand_from replay-dlq" -f -a "show" -d 'Print one dead-lettered message whole'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and __fish_seen_subcommand_from replay-dlq" -f -a "replay" -d 'Re-publish matching messages to their original destination, removing each after the broker confirmed'
complete -c wsgw -n "__fish_wsgw_using_subcommand help; and __fish_seen_subcommand_from replay-dlq" -f -a "purge" -d 'Delete matching messages from the dead-letter queue'
