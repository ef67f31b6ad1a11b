# What the Perl drivers of the benchmarks share (staging_bench.pl, fleet_backup.pl): the
# module's manager on the local cloud, servers by name, and the request loop.
#
# The EC2 endpoint and credentials come from EC2_URL, EC2_ACCESS_KEY, EC2_SECRET_KEY
# (VM::EC2's own variables); the image, login user and key directory from the
# arguments: DRIVER IMAGE_ID USERNAME DOTDIR ZONE.
# Everything the module prints goes to stderr: stdout carries the answers only.
package BenchDriver;
use strict;
use warnings;
use Exporter 'import';
use JSON::PP;
use IO::Handle;
use VM::EC2;
use VM::EC2::Staging::Manager;

our @EXPORT_OK = qw(start serve server_named);

my ($out, $manager);

# The EC2 handle and the module's manager for the arguments; answers go to a copy of
# stdout from here on, stdout itself (the module's prints, its ssh and rsync) to stderr.
sub start {
    my ($image, $username, $dotdir, $zone) = @_;
    die "usage: $0 IMAGE_ID USERNAME DOTDIR ZONE\n" unless $zone;
    open $out, '>&', \*STDOUT or die "dup stdout: $!";
    $out->autoflush(1);
    open STDOUT, '>&', \*STDERR or die "stdout to stderr: $!";
    my $ec2 = VM::EC2->new(-raise_error => 1);
    $manager = $ec2->staging_manager(
        -on_exit           => 'terminate',
        -verbose           => 0,
        -scan              => 0,
        -dotdir            => $dotdir,
        -image_name        => $image,
        -architecture      => 'x86_64',
        -username          => $username,
        # the module's own default (m1.small, a Xen type): it names devices the Xen way
        # (/dev/xvda1, /dev/sdf1 -> /dev/xvdf1) and cannot find a device on Nitro types
        -availability_zone => $zone,
    );
    return ($ec2, $manager);
}

# The server of that name: one made earlier, else get_server makes it.
sub server_named {
    my $name = shift;
    my ($server) = grep { $_->name eq $name } $manager->servers;
    return $server || $manager->get_server(-name => $name);
}

# Answer one JSON request per line of stdin with $ops->{$request->{op}}: {"ok": true,
# ...its result} or {"ok": false, "error": "<what VM::EC2 said>"}; "quit" ends it, and
# the module's servers are terminated. Two ops are common to every driver: "ssh" (a
# shell command on a server, for set-ups) and "terminate" (servers by name).
sub serve {
    my %ops = (
        ssh => sub {
            my $r = shift;
            server_named($r->{server})->ssh($r->{command})
                or die "command failed: $r->{command}\n";
            return {};
        },
        terminate => sub {
            my $r     = shift;
            my %names = map { $_ => 1 } @{ $r->{names} };
            my @gone  = grep { $names{ $_->name } } $manager->servers;
            $manager->_terminate_servers(@gone) if @gone;
            return { terminated => scalar @gone };
        },
        %{ shift() },
    );
    my $json = JSON::PP->new->canonical;
    while (my $line = <STDIN>) {
        my $request = eval { $json->decode($line) } or next;
        last if $request->{op} eq 'quit';
        my $answer = eval {
            my $op = $ops{ $request->{op} } or die "unknown op $request->{op}\n";
            my $result = $op->($request);
            { ok => JSON::PP::true, %$result };
        };
        unless ($answer) {
            (my $error = $@ || 'unknown error') =~ s/\s+$//;
            $answer = { ok => JSON::PP::false, error => $error };
        }
        $out->print($json->encode($answer), "\n");
    }
    $manager->terminate_all_servers;
}

1;
